"""The reliability suite of issue 10 (``make reliability``); see docs/RELIABILITY.md."""
