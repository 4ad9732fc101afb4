-- Routes are auto-approved only inside prefixes the enrollment key names (JSON array of
-- CIDRs). Existing keys get none: their nodes are still approved at once, their routes wait
-- for an admin (an auto-approving key used to approve any route, the route-hijack hole).
ALTER TABLE enrollment_keys ADD COLUMN auto_approve_routes TEXT NOT NULL DEFAULT '[]';
