"""The queue host's rules and state: the service (submissions, dispatch, access, limits, events,
callbacks, secrets, metrics, sweepers), run logs, the store and the blob store. No HTTP is
served from here: ``server/`` is the host's face."""
