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
