"""What the routes do, apart from HTTP plumbing, one module per job:

* :mod:`~backend.services.blocking`: blocking work (SQL, the broker, image decoding) off the event loop;
* :mod:`~backend.services.views`: a job as its client sees it (``JobPublic``, ``JobCreated``), and access to it;
* :mod:`~backend.services.jobs`: submitting a job (model version, limits, the row, the queue);
* :mod:`~backend.services.waiting`: ``?wait`` (answer with the finished job when it ends in time);
* :mod:`~backend.services.events`: a job's Server-Sent Events;
* :mod:`~backend.services.images`: result images on disk and their WebP / JPEG encodings.

Reading request bodies (multipart forms, base64 images) is :mod:`backend.uploads`. SQL goes through
:mod:`echo4o.db.crud`, the queue through :mod:`echo4o.queue`.
"""
