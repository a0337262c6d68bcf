"""Layer 3"""
