"""mailsh's benchmark: ``./dev bench`` (see docs/performance.md).

Races a real ``mailsh send --wait`` against ``ssh`` to a throwaway sshd, and measures
server throughput against its floor, intake scaling, memory, start-up and where one
round trip spends its time. Every figure is a median over repeated runs; every
comparison is a ratio measured in the same run, because the machines it runs on are
shared and noisy.
"""
