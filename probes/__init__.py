"""chipcheck.probes"""
