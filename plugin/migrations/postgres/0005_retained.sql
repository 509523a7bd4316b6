-- Retained messages of plain topics, shared by every node of a cluster: what a topic's
-- future subscribers get, kept whole as the hook layer encoded it (the store does not read
-- it). A node loads them all when it starts.
CREATE TABLE retained (
    topic      TEXT   PRIMARY KEY,
    message    BYTEA  NOT NULL,
    updated_at BIGINT NOT NULL
);
