-- Same model as migrations/sqlite/0002_groups.sql.
ALTER TABLE members ADD COLUMN role SMALLINT NOT NULL DEFAULT 1;
ALTER TABLE members ADD COLUMN joined_seq BIGINT NOT NULL DEFAULT 0;

CREATE TABLE member_removals (
    id       BIGSERIAL PRIMARY KEY,
    conv_key TEXT NOT NULL,
    uid      TEXT NOT NULL
);

-- The others' read cursor a device's last digest reported, per conversation: a digest also
-- lists the conversations where it moved since (a returning sender learns its receipts).
CREATE TABLE read_seen (
    uid           TEXT   NOT NULL,
    client_id     TEXT   NOT NULL,
    conv_id       BIGINT NOT NULL,
    peer_read_seq BIGINT NOT NULL,
    PRIMARY KEY (uid, client_id, conv_id)
);
