"""chipcheck.reproducers"""
