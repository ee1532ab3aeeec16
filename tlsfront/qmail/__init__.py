"""What a qmail host already has.

Control files, tcprules, run scripts, and `tlsfront import-qmail`.
"""
