-- Same model as migrations/sqlite/0002_groups.sql.
ALTER TABLE members ADD COLUMN role SMALLINT NOT NULL DEFAULT 1;
ALTER TABLE members ADD COLUMN joined_seq BIGINT NOT NULL DEFAULT 0;

CREATE TABLE member_removals (
    id       BIGSERIAL PRIMARY KEY,
    conv_key TEXT NOT NULL,
    uid      TEXT NOT NULL
);
