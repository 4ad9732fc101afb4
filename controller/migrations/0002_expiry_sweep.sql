-- Unix time up to which node expiries have been folded into the serial (see sweep_expired).
INSERT INTO counters (name, value) VALUES ('expiry_swept_at', 0);
