-- Same model as migrations/sqlite/0001_init.sql.
CREATE TABLE conversations (
    id        BIGSERIAL PRIMARY KEY,
    key       TEXT   NOT NULL UNIQUE,
    max_seq   BIGINT NOT NULL DEFAULT 0,
    last_time BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE members (
    uid      TEXT   NOT NULL,
    conv_id  BIGINT NOT NULL REFERENCES conversations(id),
    read_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (uid, conv_id)
);
CREATE INDEX members_by_conv ON members(conv_id);

CREATE TABLE messages (
    conv_id       BIGINT NOT NULL REFERENCES conversations(id),
    seq           BIGINT NOT NULL,
    sender        TEXT   NOT NULL,
    sender_device TEXT   NOT NULL,
    msg_id        TEXT   NOT NULL,
    server_time   BIGINT NOT NULL,
    body          BYTEA  NOT NULL,
    PRIMARY KEY (conv_id, seq)
);
CREATE UNIQUE INDEX messages_dedup ON messages(sender, msg_id);

CREATE TABLE devices (
    uid            TEXT   NOT NULL,
    client_id      TEXT   NOT NULL,
    digest_version BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (uid, client_id)
);

CREATE TABLE acked (
    uid       TEXT   NOT NULL,
    client_id TEXT   NOT NULL,
    conv_id   BIGINT NOT NULL,
    lo        BIGINT NOT NULL,
    hi        BIGINT NOT NULL,
    PRIMARY KEY (uid, client_id, conv_id, lo)
);

CREATE TABLE cleared (
    uid         TEXT   NOT NULL,
    client_id   TEXT   NOT NULL,
    conv_id     BIGINT NOT NULL,
    cleared_seq BIGINT NOT NULL,
    PRIMARY KEY (uid, client_id, conv_id)
);

CREATE TABLE digest_entries (
    uid       TEXT   NOT NULL,
    client_id TEXT   NOT NULL,
    version   BIGINT NOT NULL,
    conv_id   BIGINT NOT NULL,
    max_seq   BIGINT NOT NULL,
    PRIMARY KEY (uid, client_id, version, conv_id)
);
