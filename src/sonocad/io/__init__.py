"""Files: atomic writes and writable folders (`files`), a run directory's lifecycle: lock, finish, swap (`rundir`)."""
