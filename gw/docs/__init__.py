"""Static files of the API documentation at /docs (package data, read by gw/http_api.py).

index.html is gw's own. swagger-ui-bundle.js and swagger-ui.css are vendored
unchanged from the npm package swagger-ui-dist 5.35.0 (`npm pack
swagger-ui-dist`), Apache License 2.0: LICENSE and NOTICE are that package's,
swagger-ui-bundle.js.LICENSE.txt lists the licenses of the code it bundles.
To update: npm pack swagger-ui-dist, copy the same five files, check /docs.
"""
