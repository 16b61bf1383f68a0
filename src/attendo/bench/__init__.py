"""Side-by-side speed measurements of attendo and its peers (`attendo bench`).

Each measurement runs in a fresh worker process (so load time and peak memory are honest), and
repetitions interleave the engines so that machine noise falls on all of them alike.
"""
