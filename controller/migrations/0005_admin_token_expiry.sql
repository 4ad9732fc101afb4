-- Admin tokens may expire (unix seconds; NULL: never). Listing and revoking them is audited.
ALTER TABLE admin_tokens ADD COLUMN expires_at INTEGER;
