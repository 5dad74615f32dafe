"""Model families implemented on shared decoder blocks."""
