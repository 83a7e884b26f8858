"""What a job and a run are, shared by every side: the definition and its id, commands, units,
run states and records, worker capacity, and the worker socket's frames. No I/O here."""
