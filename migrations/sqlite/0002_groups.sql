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
