from django.urls import path

from orders import views

urlpatterns = [
    path("", views.index, name="index"),
    path("orders/<int:pk>/", views.order, name="order"),
    path("orders/<int:pk>/pay", views.pay, name="pay"),
    path("orders/<int:pk>/waiting", views.waiting, name="waiting"),
    path("orders/<int:pk>/invoice.json", views.invoice_state, name="invoice-state"),
]
