"""`sekisho controller backup` / `restore`: a consistent copy of the store with a signed manifest.

archive.py is the file format (a tar of the database copy and a manifest signed with the controller's key),
dumps.py takes and loads the copies (SQLite's online backup API, pg_dump/pg_restore), state.py reads what a
database holds (row counts, stream heads, policy versions, checkpoint head) and restore.py puts a backup
back without letting policy versions go backwards, naming the events the restore lost.
"""
