-- Same model as migrations/sqlite/0003_bounded.sql, except how retention finds what is due:
-- not through an index on the messages' times (every step would walk again the dead index
-- entries that deleted rows leave until vacuum), but per conversation, through the time of
-- its oldest message still stored; each step then reads messages above gone_seq only.
ALTER TABLE conversations ADD COLUMN gone_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN kind SMALLINT
    GENERATED ALWAYS AS (CASE WHEN key LIKE 'g:%' THEN 1 ELSE 0 END) STORED;
-- NULL while the conversation stores no message.
ALTER TABLE conversations ADD COLUMN oldest_time BIGINT;
UPDATE conversations c SET oldest_time =
    (SELECT m.server_time FROM messages m WHERE m.conv_id = c.id ORDER BY m.seq LIMIT 1);
CREATE INDEX conversations_by_age ON conversations(kind, oldest_time)
    WHERE oldest_time IS NOT NULL;

ALTER TABLE devices ADD COLUMN last_seen BIGINT NOT NULL DEFAULT 0;
UPDATE devices SET last_seen = (extract(epoch FROM now()) * 1000)::bigint;
CREATE INDEX devices_by_last_seen ON devices(last_seen);

ALTER TABLE cleared ADD COLUMN missed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE cleared ADD COLUMN missed_cleared BIGINT NOT NULL DEFAULT 0;
ALTER TABLE digest_entries ADD COLUMN missed BIGINT NOT NULL DEFAULT 0;

CREATE TABLE evictions (
    id        BIGSERIAL PRIMARY KEY,
    uid       TEXT   NOT NULL,
    client_id TEXT   NOT NULL,
    logged_at BIGINT NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::bigint
);
ALTER TABLE member_removals
    ADD COLUMN logged_at BIGINT NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::bigint;
