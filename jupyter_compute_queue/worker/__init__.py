"""The worker: runs assigned jobs in containers and reports them to the host."""
