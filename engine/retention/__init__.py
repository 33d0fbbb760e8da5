"""Retention: old data is purged in small batches, each table by its own owner.

``config`` ([retention] settings: how long each kind of data is kept), ``purge`` (the
background task ``engine run`` runs and ``engine retention show|run`` reads: it computes the
cut-off of each kind and asks the table's owner to delete or blank a batch of due rows).
"""
