"""mapdet.models"""
