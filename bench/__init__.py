"""The milterbridge benchmark: ``python -m bench.run`` (see bench/README.md).

Modules:

* ``profiles``: the load profiles (a)-(e) and the messages they send;
* ``loadgen``: the load generator, built on ``milterbridge.client``;
* ``endpoint``: the trivial aiohttp webhook endpoint the bridge calls;
* ``reference_milter``: our own minimal accept-all milter (MilterServer + a fixed handler);
* ``pymilter_milter``: the same accept-all milter on libmilter, through pymilter;
* ``procs``: child processes, CPU pinning and /proc measurements;
* ``report``: tables, target ratios and the plot;
* ``run``: the one command that runs everything.
"""
