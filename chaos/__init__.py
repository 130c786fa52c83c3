"""The truth test (`make chaos`): a workload whose truth is recorded, faults on a seeded schedule,
and an oracle that holds every scrape of the exporter against the truth (README: What the
exporter promises)."""
