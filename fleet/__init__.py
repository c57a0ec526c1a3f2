"""chipcheck.fleet"""
