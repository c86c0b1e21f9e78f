"""The gateway's HTTP routes, by concept: :mod:`.ingest` (activities and follows in),
:mod:`.feed` (pages of a user's feed) and :mod:`.ops` (health, readiness, metrics, the OpenAPI
document, the demo page and the development token). Each handler raises on error (see
:mod:`gateway.errors`); the route table is in :func:`gateway.app.create_app`."""
