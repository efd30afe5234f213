"""mapdet.core"""
