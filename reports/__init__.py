"""chipcheck.reports"""
