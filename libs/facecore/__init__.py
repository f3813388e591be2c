"""facecore: the face pipeline as pure functions over numpy arrays plus one wrapper per model.

Services (workers, API, jobs) call this library; it never imports them.
"""

__version__ = "0.1.0"
