-- Groups: a conversation keyed g:{gid} whose members have roles; a member added later starts
-- after the messages sent before it joined. Removals are logged so that every node can cut
-- removed members off their live subscriptions.
ALTER TABLE members ADD COLUMN role INTEGER NOT NULL DEFAULT 1;
ALTER TABLE members ADD COLUMN joined_seq INTEGER NOT NULL DEFAULT 0;

CREATE TABLE member_removals (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    conv_key TEXT    NOT NULL,
    uid      TEXT    NOT NULL
);

-- The others' read cursor a device's last digest reported, per conversation: a digest also
-- lists the conversations where it moved since (a returning sender learns its receipts).
CREATE TABLE read_seen (
    uid           TEXT   NOT NULL,
    client_id     TEXT   NOT NULL,
    conv_id       INTEGER NOT NULL,
    peer_read_seq INTEGER NOT NULL,
    PRIMARY KEY (uid, client_id, conv_id)
);
