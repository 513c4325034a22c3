"""The shop's URLs: its order pages, and the provider's callbacks at /callbacks/coinspaid."""

from django.urls import include, path

from orders.views import coinspaid_callback

urlpatterns = [
    path("", include("orders.urls")),
    # The URL set in the provider's back office (README: "Setting up the receiver").
    path("callbacks/coinspaid", coinspaid_callback, name="coinspaid-callback"),
]
