-- This user's own read cursor a device's last digest reported, per conversation: a digest
-- also lists the conversations another device of the user read since, so every device's
-- badges follow the reads of the others.
ALTER TABLE read_seen ADD COLUMN read_seq INTEGER NOT NULL DEFAULT 0;
