"""Layer 1, model plumbing"""
