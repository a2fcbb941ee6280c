"""The seed project's keep-awake helpers, kept under their old name: they live in the package
(`flower_classifier.workspace`), so that a notebook or script run from any folder can import them."""
from flower_classifier.workspace import (DELAY, INTERVAL, REQUEST_TIMEOUT, THREAD_NAME, TOKEN_VARIABLE,  # noqa: F401
                                         URL_VARIABLE, active_session, keep_awake)
