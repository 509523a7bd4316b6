-- Storage that stays bounded (retention, backlog caps, device expiry, erasure).

-- Retention deletes a conversation's oldest messages as a prefix: every seq up to gone_seq
-- is gone, for every device (it counts as acknowledged).
ALTER TABLE conversations ADD COLUMN gone_seq INTEGER NOT NULL DEFAULT 0;

-- 0 = 1:1, 1 = group: each kind has its own retention, found through this index.
ALTER TABLE messages ADD COLUMN kind INTEGER NOT NULL DEFAULT 0;
UPDATE messages SET kind = 1
 WHERE conv_id IN (SELECT id FROM conversations WHERE key LIKE 'g:%');
CREATE INDEX messages_by_age ON messages(kind, server_time);

-- When each device last connected (ms); devices unseen for im.device_ttl are forgotten.
-- Devices known before this migration count as seen now.
ALTER TABLE devices ADD COLUMN last_seen INTEGER NOT NULL DEFAULT 0;
UPDATE devices SET last_seen = CAST(strftime('%s', 'now') AS INTEGER) * 1000;
CREATE INDEX devices_by_last_seen ON devices(last_seen);

-- Messages a backlog cap skipped for the device, counted up for good, and how many of them
-- a cleared digest reported (both only grow, like cleared_seq); digest_entries remembers the
-- count each digest reported.
ALTER TABLE cleared ADD COLUMN missed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE cleared ADD COLUMN missed_cleared INTEGER NOT NULL DEFAULT 0;
ALTER TABLE digest_entries ADD COLUMN missed INTEGER NOT NULL DEFAULT 0;

-- Users and devices whose connections every node must close (erasure, forgotten devices);
-- read by the nodes like member_removals. client_id '' means every device of the user.
-- Both logs are kept for a day (logged_at, ms): nodes read them every im.removal_poll_ms.
CREATE TABLE evictions (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    uid       TEXT    NOT NULL,
    client_id TEXT    NOT NULL,
    logged_at INTEGER NOT NULL
);
ALTER TABLE member_removals ADD COLUMN logged_at INTEGER NOT NULL DEFAULT 0;
UPDATE member_removals SET logged_at = CAST(strftime('%s', 'now') AS INTEGER) * 1000;
