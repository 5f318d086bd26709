"""lazybench's measuring instrument: registry, network shaping, runtimes, records and charts."""
