-- The kind of each conversation (0 = 1:1, 1 = group), computed from its key as in
-- PostgreSQL's conversations.kind, so queries ask the column instead of matching keys.
ALTER TABLE conversations ADD COLUMN kind INTEGER
    GENERATED ALWAYS AS (CASE WHEN key LIKE 'g:%' THEN 1 ELSE 0 END) VIRTUAL;
