"""The montage: the site's channel-label table (``table``): loading, validation and matching."""
