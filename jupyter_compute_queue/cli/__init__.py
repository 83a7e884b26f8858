"""``jupyter compute-queue …``: the parser and the host's commands (:mod:`.main`), the job and
queue commands over the client (:mod:`.jobs`), and what they print (:mod:`.format`)."""
