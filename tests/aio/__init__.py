"""asyncio event-loop test suite: every test runs on asyncio's own loop (the reference)
and on proactor's loop (see conftest.py)."""
