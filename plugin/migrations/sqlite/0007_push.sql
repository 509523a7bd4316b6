-- Devices' registrations with push gateways (the Matrix Push Gateway API): one per app and
-- pushkey on the whole server, deleted with the device.
CREATE TABLE pushers (
    app_id TEXT NOT NULL,
    pushkey TEXT NOT NULL,
    uid TEXT NOT NULL,
    client_id TEXT NOT NULL,
    url TEXT NOT NULL,
    format TEXT NOT NULL,
    lang TEXT NOT NULL,
    data_json TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (app_id, pushkey)
);
CREATE INDEX pushers_by_device ON pushers (uid, client_id);

-- What is owed to the pushers of a user per conversation: notifications cover the messages
-- after handled_seq up to last_seq. Written in the transaction that stores a message (for
-- members with a pusher), so a crash between storing and pushing loses nothing; one row per
-- user and conversation, so it coalesces and cannot grow beyond the conversations. conv_id 0
-- is a counts-only update (a read moved the badge).
CREATE TABLE push_queue (
    uid           TEXT NOT NULL,
    conv_id       INTEGER NOT NULL,
    last_seq      INTEGER NOT NULL,
    handled_seq   INTEGER NOT NULL DEFAULT 0,
    -- When the oldest message not handled yet was stored (the delay counts from it).
    pending_since INTEGER NOT NULL,
    -- The last notification sent (the coalescing window counts from it).
    sent_at       INTEGER NOT NULL DEFAULT 0,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_at       INTEGER NOT NULL DEFAULT 0,
    -- The newest seq of the notification being sent: kept across its retries, and its id is
    -- made from it.
    sending_seq   INTEGER NOT NULL DEFAULT 0,
    claimed_by    TEXT NOT NULL DEFAULT '',
    claimed_until INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (uid, conv_id)
);
CREATE INDEX push_queue_pending ON push_queue (pending_since) WHERE last_seq > handled_seq;

-- Pushers a device lost (rejected, moved, removed), told in its next digest.
CREATE TABLE pushers_gone (
    uid       TEXT NOT NULL,
    client_id TEXT NOT NULL,
    app_id    TEXT NOT NULL,
    pushkey   TEXT NOT NULL,
    reason    TEXT NOT NULL,
    gone_at   INTEGER NOT NULL,
    PRIMARY KEY (uid, client_id, app_id, pushkey)
);
