-- Conversations: a 1:1 chat is a conversation of two members; `max_seq` is the last committed seq.
CREATE TABLE conversations (
    id        INTEGER PRIMARY KEY,
    key       TEXT    NOT NULL UNIQUE,
    max_seq   INTEGER NOT NULL DEFAULT 0,
    last_time INTEGER NOT NULL DEFAULT 0
);

-- Who belongs to a conversation, with the member's read cursor.
CREATE TABLE members (
    uid      TEXT    NOT NULL,
    conv_id  INTEGER NOT NULL REFERENCES conversations(id),
    read_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (uid, conv_id)
) WITHOUT ROWID;
CREATE INDEX members_by_conv ON members(conv_id);

-- One stored copy per message; `body` is opaque to the store.
CREATE TABLE messages (
    conv_id       INTEGER NOT NULL REFERENCES conversations(id),
    seq           INTEGER NOT NULL,
    sender        TEXT    NOT NULL,
    sender_device TEXT    NOT NULL,
    msg_id        TEXT    NOT NULL,
    server_time   INTEGER NOT NULL,
    body          BLOB    NOT NULL,
    PRIMARY KEY (conv_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_dedup ON messages(sender, msg_id);

-- Devices (client ids) seen per user, with the last digest version handed out.
CREATE TABLE devices (
    uid            TEXT    NOT NULL,
    client_id      TEXT    NOT NULL,
    digest_version INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (uid, client_id)
) WITHOUT ROWID;

-- Acknowledged seq ranges per device and conversation (inclusive, merged, non-overlapping).
CREATE TABLE acked (
    uid       TEXT    NOT NULL,
    client_id TEXT    NOT NULL,
    conv_id   INTEGER NOT NULL,
    lo        INTEGER NOT NULL,
    hi        INTEGER NOT NULL,
    PRIMARY KEY (uid, client_id, conv_id, lo)
) WITHOUT ROWID;

-- Per device and conversation: the seq up to which digest counters were cleared.
CREATE TABLE cleared (
    uid         TEXT    NOT NULL,
    client_id   TEXT    NOT NULL,
    conv_id     INTEGER NOT NULL,
    cleared_seq INTEGER NOT NULL,
    PRIMARY KEY (uid, client_id, conv_id)
) WITHOUT ROWID;

-- What each digest version covered, so ClearCounters clears exactly that.
CREATE TABLE digest_entries (
    uid       TEXT    NOT NULL,
    client_id TEXT    NOT NULL,
    version   INTEGER NOT NULL,
    conv_id   INTEGER NOT NULL,
    max_seq   INTEGER NOT NULL,
    PRIMARY KEY (uid, client_id, version, conv_id)
) WITHOUT ROWID;
