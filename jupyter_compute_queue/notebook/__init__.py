"""The notebook side: the ``%%container`` magic, its plain-text follow, and the job widget's
kernel side (its front end is ``static/widget.js``, built from ``labextension/``)."""
