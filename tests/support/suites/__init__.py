"""One test suite per store protocol (``feed.interfaces``).

Each suite is a class of tests that take a ``backend`` fixture
(:class:`tests.support.backends.Backend`). A unit module runs it against the in-memory stores
(``feed.memory``), an integration module against Redis and Cassandra: both implementations meet
the same checks.
"""
