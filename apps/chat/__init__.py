"""The ``paw chat`` terminal app (Textual). Imported only by the ``chat`` command."""
