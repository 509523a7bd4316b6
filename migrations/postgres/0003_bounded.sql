-- Same model as migrations/sqlite/0003_bounded.sql.
ALTER TABLE conversations ADD COLUMN gone_seq BIGINT NOT NULL DEFAULT 0;

ALTER TABLE messages ADD COLUMN kind SMALLINT NOT NULL DEFAULT 0;
UPDATE messages SET kind = 1
 WHERE conv_id IN (SELECT id FROM conversations WHERE key LIKE 'g:%');
CREATE INDEX messages_by_age ON messages(kind, server_time);

ALTER TABLE devices ADD COLUMN last_seen BIGINT NOT NULL DEFAULT 0;
UPDATE devices SET last_seen = (extract(epoch FROM now()) * 1000)::bigint;
CREATE INDEX devices_by_last_seen ON devices(last_seen);

ALTER TABLE cleared ADD COLUMN missed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE cleared ADD COLUMN missed_cleared BIGINT NOT NULL DEFAULT 0;
ALTER TABLE digest_entries ADD COLUMN missed BIGINT NOT NULL DEFAULT 0;

CREATE TABLE evictions (
    id        BIGSERIAL PRIMARY KEY,
    uid       TEXT NOT NULL,
    client_id TEXT NOT NULL
);
