"""chipcheck.model"""
