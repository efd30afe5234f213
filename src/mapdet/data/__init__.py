"""mapdet.data"""
