"""On PYTHONPATH of every process the tests start when OSOCKS_TEST_LOOP=asyncio (tests/run.sh's
second pass): osocks finds no uvloop and runs on the stock asyncio loop, as where python3-uvloop
is not installed."""

raise ImportError("uvloop hidden: OSOCKS_TEST_LOOP=asyncio")
