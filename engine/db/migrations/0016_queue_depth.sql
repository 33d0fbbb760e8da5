-- The hot table at depth (issue 14). Every claim, ack and defer writes a new version of a recipient
-- row, and none of them is HOT (state is in the partial indexes' predicates), so dead versions pile
-- up in the ready indexes ahead of the claim; and a burst of new rows leaves the planner believing the
-- ready set is tiny, so it sorts the whole of it on each claim until the next ANALYZE. Vacuum and
-- analyze this table after a small share of changes rather than the default 20% / 10% of it (at a
-- million rows: 200,000 dead versions before the first vacuum), and keep room on each page so a new
-- version can often stay on its page.
ALTER TABLE recipients SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.01, autovacuum_analyze_threshold = 1000,
    fillfactor = 85
);
